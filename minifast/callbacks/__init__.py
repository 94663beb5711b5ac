"""Callbacks that ship with minifast, one module per family."""
