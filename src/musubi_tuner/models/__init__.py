"""Model families: the registry of the families this tool knows (registry.py), what a version is (version.py) and
the interface every family implements (family.py). Everything outside a family's own package asks these."""
