"""The module paths the feature guide shows (agents/...), kept inside the lqmf package."""
