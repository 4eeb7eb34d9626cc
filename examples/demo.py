"""Place a few orders against the running example services and print the receipts.

Run the services first (`scripts/run`), then: `python -m examples.demo`.
"""

from __future__ import annotations

import asyncio

from sdk import Client, RemoteError


async def main() -> None:
    async with Client() as client:
        quote = await client.call("billing.quote", [{"item": "coffee", "quantity": 2}])
        print("quote:", quote)
        receipt = await client.call(
            "orders.create", {"customer": "ada", "lines": [{"item": "tea", "quantity": 3}]}
        )
        print("order:", receipt)
        try:
            await client.call(
                "orders.create", {"customer": "ada", "lines": [{"item": "caviar", "quantity": 1}]}
            )
        except RemoteError as exc:
            print("rejected as expected:", exc)


if __name__ == "__main__":
    asyncio.run(main())
