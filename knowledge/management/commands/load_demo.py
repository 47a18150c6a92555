"""``manage.py load_demo``: load the demo knowledge base that ships with the project (a fictional
outdoor-gear store: FAQ sheet, policies, store page and product entries). Safe to run again:
unchanged files are skipped and products are updated in place."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand
from django.db import transaction

from knowledge import services
from knowledge.models import Product

DEMO_DIR = Path(settings.BASE_DIR) / "demo"


class Command(BaseCommand):
    help = "Queue the demo knowledge base (demo/knowledge_base and demo/products.json) for ingestion."

    def add_arguments(self, parser):
        parser.add_argument("--collection", default="default")

    def handle(self, *args, collection, **options):
        with transaction.atomic():
            result = services.sources_register_paths([DEMO_DIR / "knowledge_base"], collection=collection, prune=True)
            products = json.loads((DEMO_DIR / "products.json").read_text())
            for entry in products:
                product, created = Product.objects.get_or_create(
                    collection=collection, sku=entry["sku"],
                    defaults={"name": entry["name"], "price": Decimal(entry["price"])},
                )
                product.name = entry["name"]
                product.price = Decimal(entry["price"])
                product.description = entry.get("description", "")
                product.attributes = entry.get("attributes", {})
                product.save()
                services.product_sync(product)
        self.stdout.write(
            f"demo knowledge base: {len(result.queued)} files queued, {len(result.unchanged)} unchanged, "
            f"{len(products)} products queued"
        )
