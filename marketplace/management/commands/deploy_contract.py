"""Deploy the FlexMarket contract (once per chain) and record its address."""

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from chain.client import FlexMarket
from core.errors import FlexError
from core.units import wei_argument
from marketplace import contract


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser):
        parser.add_argument("--force", action="store_true", help="deploy a new contract anyway")
        parser.add_argument(
            "--min-trainer-price-wei",
            type=wei_argument,
            default=settings.FLEX_MIN_TRAINER_PRICE_WEI,
        )
        parser.add_argument(
            "--min-aggregator-price-wei",
            type=wei_argument,
            default=settings.FLEX_MIN_AGGREGATOR_PRICE_WEI,
        )

    def handle(self, *args, force, min_trainer_price_wei, min_aggregator_price_wei, **options):
        try:
            existing = None if force else contract.deployment_load()
            if existing:
                market = FlexMarket(w3=contract.w3(), address=existing.address)
                if not market.built_from_artefact():
                    raise CommandError(
                        f"{settings.FLEX_DEPLOYMENT_FILE} names the FlexMarket at "
                        f"{existing.address} (chain {existing.chain_id}), built from other "
                        "sources than contracts/build/FlexMarket.json: the contract has changed "
                        "since it was deployed. `make clean` starts the local platform afresh; "
                        "--force deploys a new contract and records it instead"
                    )
                self.stdout.write(
                    f"FlexMarket already deployed at {existing.address} "
                    f"(chain {existing.chain_id}, block {existing.block})"
                )
                return
            market = FlexMarket.deploy(
                w3=contract.w3(),
                sender=contract.registrar(),
                min_trainer_price_wei=min_trainer_price_wei,
                min_aggregator_price_wei=min_aggregator_price_wei,
            )
            record = contract.Deployment(
                chain_id=contract.chain_id(), address=market.address, block=market.deploy_block
            )
            path = contract.deployment_save(record)
        except FlexError as exc:
            raise CommandError(exc.message) from exc
        self.stdout.write(
            f"FlexMarket deployed at {record.address} (chain {record.chain_id}, "
            f"block {record.block}); recorded in {path}"
        )
