"""Corpora: a world (:mod:`factlab.world`, pure data) with how it is rendered
(:mod:`factlab.text`), and the world directory that stores both.

This layer sits above world and text so that neither imports the other's half: the world
never imports text; text renders any world it is given; a corpus joins them for the
stages that need both (tokenizers, streams, evaluation, probes)."""

from factlab.corpus.config import CorpusConfig
from factlab.corpus.corpus import Corpus, make_corpus
from factlab.corpus.store import load_world, save_experiences, save_world

__all__ = ["Corpus", "CorpusConfig", "load_world", "make_corpus", "save_experiences",
           "save_world"]
