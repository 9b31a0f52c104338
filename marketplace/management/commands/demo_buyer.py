"""Create (once) the local demo buyer with a funded wallet; print its login as JSON."""

import json
import secrets

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from core.errors import FlexError
from marketplace import contract, services
from marketplace.models import Wallet
from marketplace.wallets import wallet_balance_wei

USERNAME = "demo"


class Command(BaseCommand):
    help = __doc__

    def handle(self, *args, **options):
        if not contract.on_dev_chain():
            raise CommandError("the demo buyer exists only on the local dev chain")
        password_file = settings.VAR_DIR / "demo_password"
        user = get_user_model().objects.filter(username=USERNAME).first()
        if user is None or not password_file.exists():
            password = secrets.token_urlsafe(12)
            password_file.write_text(password)
            password_file.chmod(0o600)
            if user is None:
                user = services.user_signup(username=USERNAME, password=password)
            else:
                user.set_password(password)
                user.save(update_fields=["password"])
        wallet = Wallet.objects.get(user=user)
        try:
            if wallet_balance_wei(wallet=wallet) < settings.FLEX_FAUCET_WEI // 2:
                services.wallet_fund(wallet=wallet)
        except FlexError as exc:
            raise CommandError(exc.message) from exc
        login = {
            "username": USERNAME,
            "password": password_file.read_text().strip(),
            "address": wallet.address,
        }
        self.stdout.write(json.dumps(login))
