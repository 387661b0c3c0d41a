"""Text: render a world into documents (bios with augmentations, bioR-like prose, QA pairs),
each tagged with the person it is about and the character span of every attribute value."""
