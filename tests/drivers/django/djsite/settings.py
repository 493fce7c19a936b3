"""Settings of the minimal Django project the driver tests run: one app (dj),
one database, the URL taken from MERIDIAN_URL (postgres://user@host:port/db)."""
import os
from urllib.parse import urlparse

_url = urlparse(os.environ.get("MERIDIAN_URL", "postgres://postgres@127.0.0.1:6432/postgres"))

SECRET_KEY = "meridian-driver-tests"
DEBUG = False
USE_TZ = True
INSTALLED_APPS = ["dj"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": _url.path.lstrip("/"),
        "USER": _url.username or "",
        "PASSWORD": _url.password or "",
        "HOST": _url.hostname,
        "PORT": str(_url.port or 5432),
    }
}
