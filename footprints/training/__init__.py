"""Dense training of the segmenter: the resume decision, the model set-up and the trainer's loop."""
