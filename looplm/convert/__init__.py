"""Make a pretrained checkpoint cheaper: linearise its attention (Liger) or fold its layers into a
shared recursive core (Relaxed Recursive Transformers); ``looplm train --init`` then fine-tunes."""
