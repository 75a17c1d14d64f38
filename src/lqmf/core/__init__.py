"""Decisions without heavy imports: configs, workspace, registry, datasets, arithmetic."""
