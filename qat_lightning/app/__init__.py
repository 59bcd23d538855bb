"""qat_lightning.app (see DESIGN.md)."""
