"""Typer commands: parse, call core/engine, print."""
