"""The embedded model's world: synthetic scenes of coloured shapes and their exact detector (:mod:`.shapes`), the
word tokenizer (:mod:`.tokenizers`), prompt sets and seeded generation for scoring (:mod:`.evaluation`)."""
