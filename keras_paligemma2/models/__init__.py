"""The backbone, the causal LM task, the KV-cache decode loop, the layout
rules each weight shards by, and the parsing of detection/segmentation text."""
