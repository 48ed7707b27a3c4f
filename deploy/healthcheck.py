"""The container's HEALTHCHECK: exit 0 when the gateway's /healthz answers 200, else 1.

Reads HEALTHCHECK_URL (default http://127.0.0.1:5000/healthz); ignores proxy variables
(a proxy set for the gateway's own use must not be asked about loopback). Standard
library only: the image has no curl.
"""

import os
import sys
import urllib.request

URL = os.environ.get("HEALTHCHECK_URL") or "http://127.0.0.1:5000/healthz"


def main() -> int:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(URL, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except OSError as exc:  # URLError, HTTPError (a non-2xx), refused, timed out
        print(f"healthcheck: {URL}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
