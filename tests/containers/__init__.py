"""Container engines and the stand-in images of the `containers` tier (README.md here)."""
