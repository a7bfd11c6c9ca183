"""Text and images to model inputs: the tokenizer, the image converter
(big_vision's pipeline and named alternatives) and the preprocessor."""
