"""`python -m dlmctl.service`: the API on DLMCTL_SERVICE_HOST:DLMCTL_SERVICE_PORT (settings.py)."""
from __future__ import annotations

import logging
import sys


def main() -> int:
    import uvicorn
    from pydantic import ValidationError

    from dlmctl.spec.settings import ServiceSettings

    try:
        settings = ServiceSettings()
    except ValidationError as err:
        print(f"dlmctl service: bad setting: {' '.join(str(err).split())[:300]}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    from .app import create_app

    try:
        app = create_app(settings)
    except Exception as err:  # no kubeconfig / not in a cluster: one line, no traceback
        print(f"dlmctl service: cannot use the Kubernetes configuration: {' '.join(str(err).split())[:300]}",
              file=sys.stderr)
        return 2
    # uvicorn's access log would print raw paths and queries; ours (app.RequestContext) names the route.
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                access_log=False, server_header=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
