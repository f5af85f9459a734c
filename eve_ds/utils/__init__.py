"""Small helpers every layer uses: atomic file writes, configuration errors and dotted overrides,
expert-parallel rank. Imports nothing of eve_ds."""
