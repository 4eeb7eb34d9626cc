"""The notifications service, written as plain functions: it tells customers about their orders."""

from __future__ import annotations

from loguru import logger

from sdk import Context, microservice

SENT: list[dict[str, object]] = []


@microservice(event="order.created", service="notifications")
async def order_created(ctx: Context) -> None:
    """Tell the customer that their order was taken."""
    message = {"to": ctx.body["customer"], "text": f"Order {ctx.body['order_id']} confirmed"}
    SENT.append(message)
    logger.info("notification sent to={} order_id={}", message["to"], ctx.body["order_id"])


@microservice(route="send", service="notifications")
async def send(ctx: Context) -> dict[str, int]:
    """Send a free-form notification: `{"to": ..., "text": ...}`."""
    SENT.append(dict(ctx.body))
    return {"queued": len(SENT)}
