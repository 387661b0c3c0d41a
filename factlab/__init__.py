"""factlab: controlled experiments on how language models store, extract, hallucinate and
forget facts.

The package reads like the flow of an experiment::

    world  ->  text  ->  tokens  ->  model  ->  train  ->  evaluate / probe  ->  report

``factlab.world`` holds people and their facts (pure data, no torch); ``factlab.text``
renders them into documents (bios, QA) with the character span of every value.
"""

__version__ = "0.1.0"
