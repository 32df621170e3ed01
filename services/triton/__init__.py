"""Triton: the embedded server launcher and the gateway's client."""
