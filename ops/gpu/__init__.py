"""Scripts and measurements for the lent GPU machine (see README.md here)."""
