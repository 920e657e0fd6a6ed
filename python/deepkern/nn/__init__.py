"""Drop-in modules built on the deepkern ops."""
