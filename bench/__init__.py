"""Side-by-side benchmark of Sibyl against two ceilings and a naive baseline: `make bench`."""
