"""The example app: the express-session visit counter, login/logout and a cached page."""
