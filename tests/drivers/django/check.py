"""Django 5 (psycopg 3) through meridian, with the minimal project beside this
file. Arguments: a libpq URL and a phase:
  write: `migrate dj` (0001 creates dj_author and dj_book, 0002 adds a
         column), ORM writes, transaction.atomic() committed and rolled back,
         an IntegrityError inside atomic() rolled back with the connection
         going on, and a savepoint (nested atomic) with an IntegrityError
         caught while the outer block commits;
  zero:  `migrate dj zero` (drops the app's tables)."""
import datetime
import os
import sys

url, phase = sys.argv[1], sys.argv[2]
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ["MERIDIAN_URL"] = url
os.environ["DJANGO_SETTINGS_MODULE"] = "djsite.settings"

import django  # noqa: E402

django.setup()

from django.core.management import call_command  # noqa: E402
from django.db import IntegrityError, connection, transaction  # noqa: E402
from django.db.models import F  # noqa: E402

from dj.models import Author, Book  # noqa: E402


def tables():
    with connection.cursor() as c:
        c.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND left(tablename, 3) = 'dj_' ORDER BY 1")
        return [r[0] for r in c.fetchall()]


if phase == "write":
    call_command("migrate", "dj", verbosity=1)
    assert tables() == ["dj_author", "dj_book"], tables()
    print("migrate dj: dj_author and dj_book")

    authors = [Author.objects.create(name=f"author{i}", born=datetime.date(1950 + i, 1, 1)) for i in range(3)]
    Book.objects.bulk_create([Book(title=f"book{i}", author=authors[i % 3], pages=100 + i) for i in range(6)])
    Book.objects.filter(author=authors[0]).update(pages=F("pages") + 1)
    Author.objects.filter(name="author1").update(email="a1@example.org")
    assert [b.pages for b in Book.objects.filter(author=authors[0]).order_by("title")] == [101, 104]
    print("ORM writes: 3 authors, 6 books, updates")

    with transaction.atomic():
        Book.objects.create(title="committed", author=authors[1])
    try:
        with transaction.atomic():
            Book.objects.create(title="rolled back", author=authors[1])
            raise RuntimeError("roll back")
    except RuntimeError:
        pass
    assert not Book.objects.filter(title="rolled back").exists()
    print("atomic() committed and rolled back")

    # An IntegrityError inside atomic(): the block rolls back, the connection goes on.
    try:
        with transaction.atomic():
            Book.objects.create(title="lost with the error", author=authors[2])
            Author.objects.create(name="author0")
        raise AssertionError("no IntegrityError")
    except IntegrityError:
        pass
    assert not Book.objects.filter(title="lost with the error").exists()
    print("IntegrityError in atomic() rolled back, connection still usable")

    # A savepoint (nested atomic) with an IntegrityError caught; the outer block commits.
    with transaction.atomic():
        Book.objects.create(title="before savepoint", author=authors[0])
        try:
            with transaction.atomic():
                Author.objects.create(name="author2")
            raise AssertionError("no IntegrityError")
        except IntegrityError:
            pass
        Book.objects.create(title="after savepoint", author=authors[0])
    assert Book.objects.filter(title__endswith=" savepoint").count() == 2
    Author.objects.create(name="author3", email="a3@example.org")
    Book.objects.filter(title="book5").delete()
    assert Book.objects.count() == 8, Book.objects.count()
    print("savepoint with an IntegrityError rolled back, transaction committed")
elif phase == "zero":
    call_command("migrate", "dj", "zero", verbosity=1)
    assert tables() == [], tables()
    print("migrate dj zero: the app's tables are gone")
else:
    raise SystemExit(f"unknown phase {phase}")
print("django ok")
