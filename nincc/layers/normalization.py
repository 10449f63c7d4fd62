"""Layer family: normalization (entries registered into the table)."""
