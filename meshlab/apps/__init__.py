"""Small programs pods run in meshlab (``meshlab app NAME``): standard library only."""
