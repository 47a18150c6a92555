"""Chunks carry their source's collection, kept equal to it by triggers, and one GIN index over
(collection, search_vector) (btree_gin), so the full-text leg's per-word counts and matches stay
inside the searched collection's postings instead of visiting every chunk of every collection that
holds the word (knowledge.selectors.chunk_search)."""

import django.contrib.postgres.indexes
from django.contrib.postgres.operations import BtreeGinExtension
from django.db import migrations, models

TRIGGERS = """
CREATE FUNCTION knowledge_chunk_set_collection() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    SELECT s.collection INTO NEW.collection FROM knowledge_source s WHERE s.id = NEW.source_id;
    RETURN NEW;
END $$;
CREATE TRIGGER knowledge_chunk_set_collection BEFORE INSERT OR UPDATE OF source_id, collection
    ON knowledge_chunk FOR EACH ROW EXECUTE FUNCTION knowledge_chunk_set_collection();

CREATE FUNCTION knowledge_source_move_chunks() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE knowledge_chunk SET collection = NEW.collection WHERE source_id = NEW.id;
    RETURN NULL;
END $$;
CREATE TRIGGER knowledge_source_move_chunks AFTER UPDATE OF collection ON knowledge_source
    FOR EACH ROW WHEN (OLD.collection IS DISTINCT FROM NEW.collection)
    EXECUTE FUNCTION knowledge_source_move_chunks();

UPDATE knowledge_chunk c SET collection = s.collection FROM knowledge_source s WHERE s.id = c.source_id;
"""

DROP_TRIGGERS = """
DROP TRIGGER IF EXISTS knowledge_source_move_chunks ON knowledge_source;
DROP FUNCTION IF EXISTS knowledge_source_move_chunks();
DROP TRIGGER IF EXISTS knowledge_chunk_set_collection ON knowledge_chunk;
DROP FUNCTION IF EXISTS knowledge_chunk_set_collection();
"""


class Migration(migrations.Migration):

    dependencies = [
        ("knowledge", "0004_source_pending_version"),
    ]

    operations = [
        BtreeGinExtension(),
        migrations.AddField(
            model_name="chunk",
            name="collection",
            field=models.CharField(default="", editable=False, max_length=100),
        ),
        migrations.RunSQL(TRIGGERS, DROP_TRIGGERS),
        migrations.RemoveIndex(model_name="chunk", name="chunk_search_vector_gin"),
        migrations.AddIndex(
            model_name="chunk",
            index=django.contrib.postgres.indexes.GinIndex(
                fields=["collection", "search_vector"], name="chunk_collection_search_gin"
            ),
        ),
    ]
