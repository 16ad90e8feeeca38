from tests.corpus import write_corpus

write_corpus()
