from django.db import models


class Author(models.Model):
    name = models.CharField(max_length=100, unique=True)
    born = models.DateField(null=True)
    email = models.EmailField(null=True)


class Book(models.Model):
    title = models.CharField(max_length=200)
    author = models.ForeignKey(Author, on_delete=models.CASCADE, related_name="books")
    pages = models.IntegerField(default=0)
    isbn = models.CharField(max_length=20, null=True)

    class Meta:
        indexes = [models.Index(fields=["title"], name="dj_book_title_idx")]
