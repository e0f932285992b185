"""The network: VGG16 backbone, hypercolumns, the MLP and its exact 1x1-convolution segmenter, the dense head, losses, devices."""
