"""Porting between torch `weights.pt` state dicts and jaxgpt's Flax parameters."""
