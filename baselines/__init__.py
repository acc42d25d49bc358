"""One readable file per paper. Each method subclasses ``retrieval.module.RetrievalModule``."""
