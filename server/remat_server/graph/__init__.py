"""The graph stage: the validated IR (`ir`), how a client's spec becomes one
(`validate`, through `builder`), and the size limits every tensor respects (`limits`)."""
