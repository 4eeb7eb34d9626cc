"""The orders service: takes an order, charges it through billing, announces it."""

from __future__ import annotations

import itertools
import os

from pydantic import BaseModel, Field

from examples.billing import Line
from sdk import Context, Service, route


class NewOrder(BaseModel):
    customer: str = Field(min_length=1)
    lines: list[Line] = Field(min_length=1)


class Orders(Service):
    name = "orders"

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._prefix = f"o{os.getpid()}"

    @route("create")
    async def create(self, ctx: Context, order: NewOrder) -> dict[str, object]:
        """Charge the order through billing, emit `order.created` and return the receipt."""
        order_id = f"{self._prefix}-{next(self._ids)}"
        charge = await ctx.call(
            "billing.charge",
            {"order_id": order_id, "customer": order.customer, "lines": order.model_dump()["lines"]},
            timeout=10,
        )
        event = {"order_id": order_id, "customer": order.customer, "total_cents": charge["total_cents"]}
        await ctx.emit("order.created", event)
        return {"order_id": order_id, "charge": charge}
