"""looplm: efficient language models whose parameters are decoupled from compute per token.

Recursive depth with per-token routing (Mixture-of-Recursions), fixed-state token mixers
(linear attention, retention, GLA, DeltaNet, gated DeltaNet), sparse mixture-of-experts and
low precision, in one composable model. See docs/architecture.md for the map.
"""

__version__ = "0.1.0"
