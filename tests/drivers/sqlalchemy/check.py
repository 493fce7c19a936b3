"""SQLAlchemy 2 (psycopg 3 driver) and Alembic through meridian:
metadata.create_all (SQLAlchemy's DDL text starts with a newline), ORM
inserts, commit, rollback, an IntegrityError rolled back and the session
going on, a savepoint (begin_nested) with an error, then `alembic upgrade
head` with tests/drivers/alembic (creates a table, adds a column, adds an
index) and ORM inserts into the migrated table. Argument: a libpq URL."""
import os
import sys
from decimal import Decimal

from alembic import command
from alembic.config import Config
from sqlalchemy import BigInteger, ForeignKey, Identity, Numeric, Text, create_engine, func, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

url = sys.argv[1].replace("postgres://", "postgresql+psycopg://", 1)
here = os.path.dirname(os.path.abspath(__file__))


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "sqla_users"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    name: Mapped[str] = mapped_column(Text, unique=True)
    karma: Mapped[int] = mapped_column(default=0)
    posts: Mapped[list["Post"]] = relationship(back_populates="author")


class Post(Base):
    __tablename__ = "sqla_posts"
    id: Mapped[int] = mapped_column(primary_key=True)  # SERIAL
    user_id: Mapped[int] = mapped_column(ForeignKey("sqla_users.id"), index=True)
    title: Mapped[str] = mapped_column(Text)
    author: Mapped[User] = relationship(back_populates="posts")


engine = create_engine(url)
Base.metadata.create_all(engine)
print("create_all: sqla_users, sqla_posts and an index")

with Session(engine) as s:
    s.add_all([User(name=f"user{i}", posts=[Post(title=f"post{i}.{j}") for j in range(2)]) for i in range(5)])
    s.commit()
    assert s.scalar(select(func.count()).select_from(Post)) == 10
    print("ORM inserts: 5 users with 2 posts each, committed")

    s.execute(update(User).where(User.name == "user1").values(karma=User.karma + 10))
    s.commit()
    s.execute(update(User).values(karma=-1))
    s.rollback()
    assert s.scalar(select(User.karma).where(User.name == "user1")) == 10
    s.commit()
    print("commit and rollback")

    # An IntegrityError inside a transaction: rolled back, the session goes on.
    s.add(Post(title="rolled back", author=s.scalar(select(User).where(User.name == "user0"))))
    s.add(User(name="user2"))
    try:
        s.commit()
        raise AssertionError("no IntegrityError")
    except IntegrityError as e:
        assert e.orig.sqlstate == "23505", e.orig.sqlstate
        s.rollback()
    assert s.scalar(select(func.count()).select_from(Post).where(Post.title == "rolled back")) == 0
    print("IntegrityError rolled back, session still usable")

    # A savepoint with an error; the outer transaction commits.
    u3 = s.scalar(select(User).where(User.name == "user3"))
    u3.posts.append(Post(title="before savepoint"))
    try:
        with s.begin_nested():
            s.add(User(name="user4"))
        raise AssertionError("no IntegrityError")
    except IntegrityError:
        pass
    u3.posts.append(Post(title="after savepoint"))
    s.commit()
    assert s.scalar(select(func.count()).select_from(Post).where(Post.title.like("% savepoint"))) == 2
    print("savepoint with an error rolled back, transaction committed")

# Alembic: 0001 creates sqla_orders, 0002 adds a column and an index.
cfg = Config()
cfg.set_main_option("script_location", os.path.join(here, "..", "alembic"))
cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
command.upgrade(cfg, "head")
with engine.connect() as c:
    assert c.scalar(text("SELECT version_num FROM sqla_alembic_version")) == "0002"
    assert c.scalar(text("SELECT count(*) FROM pg_indexes WHERE indexname = 'sqla_orders_customer_idx'")) == 1
print("alembic upgrade head: sqla_orders created, note added, index added")


class Base2(DeclarativeBase):
    pass


class Order(Base2):
    __tablename__ = "sqla_orders"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    user_id: Mapped[int] = mapped_column(BigInteger)
    customer: Mapped[str] = mapped_column(Text)
    total: Mapped[Decimal] = mapped_column(Numeric(10, 2))
    note: Mapped[str | None] = mapped_column(Text)


with Session(engine) as s:
    ids = s.scalars(select(User.id).order_by(User.name)).all()
    s.add_all([Order(user_id=ids[i % 5], customer=f"c{i % 3}", total=Decimal(i) + Decimal("0.99"), note=None if i % 2 else f"n{i}") for i in range(8)])
    s.commit()
    assert s.scalar(select(func.count()).select_from(Order).where(Order.customer == "c1")) == 3
print("ORM inserts into the migrated table: 8 orders")
engine.dispose()
print("sqlalchemy ok")
