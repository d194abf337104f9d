"""The zeroth-order engine: directions, weight stores, the prefix cache, the trajectory log and replay."""
