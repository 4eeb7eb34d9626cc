"""The billing service: prices orders and charges customers, answering RPC calls."""

from __future__ import annotations

import itertools

from pydantic import BaseModel, Field

from sdk import Context, Reject, Service, route

PRICES_CENTS = {"apple": 50, "bread": 250, "coffee": 900, "tea": 400}


class Line(BaseModel):
    item: str
    quantity: int = Field(gt=0)


class ChargeRequest(BaseModel):
    order_id: str
    customer: str
    lines: list[Line] = Field(min_length=1)


class Billing(Service):
    name = "billing"

    def __init__(self) -> None:
        self._charge_ids = itertools.count(1)

    @route("quote")
    async def quote(self, lines: list[Line]) -> dict[str, int]:
        """Return the total of some order lines in cents."""
        return {"total_cents": _total(lines)}

    @route("charge")
    async def charge(self, ctx: Context, request: ChargeRequest) -> dict[str, object]:
        """Charge the customer for an order; unknown items are rejected."""
        total = _total(request.lines)
        if request.customer == "blocked":
            raise Reject(f"customer {request.customer!r} may not be charged")
        return {
            "charge_id": f"ch-{ctx.service}-{next(self._charge_ids)}",
            "order_id": request.order_id,
            "total_cents": total,
        }


def _total(lines: list[Line]) -> int:
    unknown = sorted({line.item for line in lines} - PRICES_CENTS.keys())
    if unknown:
        raise ValueError(f"unknown items: {', '.join(unknown)}; known items: {', '.join(PRICES_CENTS)}")
    return sum(PRICES_CENTS[line.item] * line.quantity for line in lines)
