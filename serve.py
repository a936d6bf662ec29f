"""`python serve.py [gunicorn options]`: gunicorn with gunicorn.conf.py serving wsgi:app (make run, the image)."""

import os
import sys

from config import web_concurrency


def main() -> None:
    """Check WEB_CONCURRENCY as every setting is checked, then become gunicorn."""
    # gunicorn int()s WEB_CONCURRENCY when it is imported, before gunicorn.conf.py can name a bad value, so ""
    # or "abc" would be a traceback. Checked here first (empty counts as unset, as for every setting).
    os.environ["WEB_CONCURRENCY"] = str(web_concurrency())
    gunicorn = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", *sys.argv[1:], "wsgi:app"]
    os.execv(sys.executable, gunicorn)  # noqa: S606 - fixed arguments, no shell: this process becomes gunicorn


if __name__ == "__main__":
    main()
