"""Layer family: vision (entries registered into the table)."""
