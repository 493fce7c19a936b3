-- Schema for the example rules in shop.toml:
--   meridian demo --schema conflict-rules/examples/shop.sql --rules conflict-rules/examples
CREATE TABLE stock (item int PRIMARY KEY, quantity int NOT NULL);
CREATE TABLE orders (id int PRIMARY KEY, status text NOT NULL, paid numeric NOT NULL DEFAULT 0, note text,
                     address text);
CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL, email text UNIQUE);
CREATE TABLE prices (item int PRIMARY KEY, price numeric NOT NULL);
CREATE TABLE events (at timestamptz NOT NULL DEFAULT now(), what text);
