"""Products: each product is rendered as a Markdown document (``product_markdown``) and ingested as
the source ``product:<sku>`` of its collection."""

from __future__ import annotations

from decimal import Decimal

from django.core.files.base import ContentFile
from django.db import transaction

from knowledge.models import Product, Source
from knowledge.services.sources import _locked_source, pending_file_store, source_delete, sources_enqueue


def product_markdown(product: Product) -> str:
    """Render ``product`` as the Markdown document that is ingested for it."""
    price = Decimal(product.price).quantize(Decimal("0.01"))
    lines = [f"# {product.name}", "", f"SKU: {product.sku}. Price: {price} {product.currency}."]
    if product.description.strip():
        lines += ["", product.description.strip()]
    if product.attributes:
        lines += ["", "## Specifications", ""]
        lines += [f"- {key}: {value}" for key, value in product.attributes.items()]
    return "\n".join(lines) + "\n"


@transaction.atomic
def product_sync(product: Product) -> Source:
    """Queue (re-)ingestion of ``product`` as the source ``product:<sku>`` of its collection.

    Call after saving a product; an unchanged rendering is skipped by ``document_ingest``. If the SKU
    or the collection changed, the source of the old SKU or collection is deleted.
    """
    uri = f"product:{product.sku}"
    if product.source_id and (product.source.uri != uri or product.source.collection != product.collection):
        source_delete(product.source)
        product.source = None
    source = _locked_source(
        collection=product.collection, uri=uri, defaults={"kind": Source.Kind.PRODUCT, "title": product.name}
    )
    pending_file_store(source, f"product-{product.sku}.md", ContentFile(product_markdown(product).encode()))
    source.title = product.name
    source.status, source.progress, source.error = Source.Status.QUEUED, 0, ""
    source.save()
    Product.objects.filter(pk=product.pk).update(source=source)
    product.source = source
    sources_enqueue([source.pk])
    return source


@transaction.atomic
def product_delete(product: Product) -> None:
    """Delete ``product`` and the source (and chunks) that made it retrievable."""
    if product.source_id:
        source_delete(product.source)
    product.delete()
