"""A small shop for the table browser's tests: ``customers`` (137 rows, never analysed), ``orders`` pointing at
customers (3 for customer 1, 1 for customer 2), ``line_items`` pointing at orders, and ``events`` with a
``json`` column; plus a second user whose table must stay unreachable. Made in the global database with its
login role, as an agent's tables would be."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import leakscan
import psycopg
from api_support import role_names
from helpers import global_uri

from agentpg.app.runtime import Runtime

SHOP = [
    """CREATE TABLE customers (
         id integer PRIMARY KEY, name text NOT NULL, email text, tier text, signed_up date,
         balance numeric(12,2), notes text)""",
    """INSERT INTO customers
       SELECT g, 'customer ' || lpad(g::text, 3, '0'),
              CASE WHEN g % 10 = 0 THEN NULL ELSE 'c' || g || '@example.com' END,
              (ARRAY['gold', 'silver', 'bronze'])[1 + g % 3],
              date '2024-01-01' + g, (g * 1.25)::numeric(12,2),
              CASE WHEN g = 1 THEN repeat('a very long note ', 30) || 'THE END'
                   WHEN g = 2 THEN E'first line\\nsecond line'
                   WHEN g = 3 THEN '100% sure_thing' ELSE 'note ' || g END
       FROM generate_series(1, 137) AS g""",
    "CREATE TABLE orders (id integer PRIMARY KEY, customer_id integer REFERENCES customers(id), total numeric)",
    "INSERT INTO orders VALUES (10, 1, 9.50), (11, 1, 20), (12, 1, 3.25), (13, 2, 7), (14, NULL, 1)",
    """CREATE TABLE line_items (order_id integer REFERENCES orders(id), line integer, sku text,
                                PRIMARY KEY (order_id, line))""",
    "INSERT INTO line_items VALUES (10, 1, 'A-1'), (10, 2, 'B-2'), (11, 1, 'A-1')",
    """CREATE TABLE shipments (id integer PRIMARY KEY, order_id integer, line integer,
                               FOREIGN KEY (order_id, line) REFERENCES line_items (order_id, line))""",
    "INSERT INTO shipments VALUES (1, 10, 2), (2, 10, 2), (3, NULL, 1)",
    "CREATE TABLE events (id integer PRIMARY KEY, payload json, at timestamptz)",
    "INSERT INTO events VALUES (1, '{\"a\": 1}', '2024-05-01 12:00:00+00')",
]


@dataclass
class Shop:
    user: str
    token: str
    other_user: str
    other_token: str
    passwords: set[str] = field(default_factory=set)


def make_shop(runtime: Runtime) -> Shop:
    svc = runtime.service
    user, other = f"shop-{uuid.uuid4().hex[:8]}", f"rival-{uuid.uuid4().hex[:8]}"
    svc.register_user(user)
    svc.register_user(other)
    shop = Shop(user, svc.issue_user_token(user).secret, other, svc.issue_user_token(other).secret)
    uris = [global_uri(runtime, user), global_uri(runtime, other)]
    shop.passwords = {p for p in (urlsplit(u).password for u in uris) if p}
    with psycopg.connect(uris[0], autocommit=True) as conn:
        for statement in SHOP:
            conn.execute(statement)
    with psycopg.connect(uris[1], autocommit=True) as conn:
        conn.execute("CREATE TABLE customers (id int PRIMARY KEY, name text)")
        conn.execute("INSERT INTO customers VALUES (1, 'RIVAL-SECRET-VALUE')")
    return shop


def drop_shop(runtime: Runtime, shop: Shop) -> None:
    for user in (shop.user, shop.other_user):
        try:
            runtime.service.delete_user(user)
        except Exception:  # noqa: S112 - best effort: a failed test may have left it half-made
            continue


def check_html(runtime: Runtime, shop: Shop, source: str, html: str) -> None:
    """The page goes to the leak scanner and holds no password, role name, URI, token or the rival's data."""
    leakscan.record(source, html)
    for secret in (*shop.passwords, shop.token, shop.other_token, *role_names(runtime)):
        assert secret not in html, f"{source}: a secret or role name appears in the page"
    assert not re.search(r"postgres(?:ql)?://", html), f"{source}: a connection string appears in the page"
    assert "RIVAL-SECRET-VALUE" not in html, f"{source}: another user's data"
