"""Human review of unsure results, A2I-style: flow definitions, human loops, leased delivery, A2I output."""
