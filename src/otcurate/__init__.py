"""otcurate."""
