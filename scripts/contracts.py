"""Generate or check `contracts/`: event JSON Schemas, the AsyncAPI document, the gateway's OpenAPI.

    uv run python scripts/contracts.py write   # regenerate the files after changing the code
    uv run python scripts/contracts.py check   # exit 1 and list the files that drifted

The event contracts come from `fabrik_common.contracts`; the OpenAPI document is built here
because `fabrik_common` must not depend on the gateway.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fabrik_common.contracts import check_contracts, write_contracts
from fabrik_gateway.app import build
from fabrik_gateway.settings import GatewaySettings

ROOT = Path(__file__).resolve().parent.parent


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document the gateway serves, from its route handlers (nothing is started)."""
    service = build(GatewaySettings())
    return service.http_app.openapi_schema.to_schema()


def check(root: Path = ROOT) -> list[str]:
    return check_contracts(root, openapi_document())


def write(root: Path = ROOT) -> list[str]:
    return write_contracts(root, openapi_document())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("command", choices=("write", "check"))
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root (default: %(default)s)")
    args = parser.parse_args(argv)
    root: Path = args.root
    if args.command == "write":
        changed = write(root)
        for path in changed:
            print(f"wrote {path}" if (root / path).exists() else f"removed {path}")
        print(f"contracts up to date ({len(changed)} file(s) changed)")
        return 0
    drifted = check(root)
    if drifted:
        print("contracts/ differs from what the code generates:", file=sys.stderr)
        for item in drifted:
            print(f"  {item}", file=sys.stderr)
        print("run: uv run python scripts/contracts.py write", file=sys.stderr)
        return 1
    print("contracts up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
