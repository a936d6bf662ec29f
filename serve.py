"""`python serve.py [gunicorn options]`: gunicorn with gunicorn.conf.py serving wsgi:app (make run, the image)."""

import os
import sys

from config import from_env, number, usable_cpus


def main() -> None:
    """Check WEB_CONCURRENCY as every setting is checked, then become gunicorn."""
    # gunicorn int()s WEB_CONCURRENCY when it is imported, before gunicorn.conf.py can name a bad value, so ""
    # or "abc" would be a traceback. Checked here first (empty counts as unset, as for every setting).
    workers = from_env("WEB_CONCURRENCY", str(usable_cpus()), number(minimum=1))
    os.environ["WEB_CONCURRENCY"] = str(workers)
    gunicorn = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", *sys.argv[1:], "wsgi:app"]
    os.execv(sys.executable, gunicorn)  # noqa: S606 - fixed arguments, no shell: this process becomes gunicorn


if __name__ == "__main__":
    main()
