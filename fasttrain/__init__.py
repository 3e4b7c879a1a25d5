"""fasttrain."""
