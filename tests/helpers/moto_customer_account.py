"""Sets up a "customer" AWS account in a moto server for the Local Data Storage tests.

Creates Meridian's IAM user (with an access key), the customer's admin user, a role whose trust policy lets that user assume
it only with the given external id, a bucket in the given region, then turns on moto's IAM
enforcement. Prints the user's keys and the role ARN as JSON.

Usage: python3 moto_customer_account.py ENDPOINT BUCKET REGION EXTERNAL_ID
       python3 moto_customer_account.py trust ENDPOINT ADMIN_KEY ADMIN_SECRET EXTERNAL_ID
The second form (run after enforcement is on, with the customer admin's keys) makes the role's
trust policy require another external id: a project's id is only known once it exists.
"""
import json
import sys
import urllib.request

import boto3

account = "123456789012"


def trust_policy(external_id):
    return json.dumps({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow",
        "Principal": {"AWS": f"arn:aws:iam::{account}:user/meridian"},
        "Action": "sts:AssumeRole",
        "Condition": {"StringEquals": {"sts:ExternalId": external_id}},
    }]})


if sys.argv[1] == "trust":
    endpoint, admin_key, admin_secret, external_id = sys.argv[2:6]
    iam = boto3.client("iam", region_name="us-east-1", endpoint_url=endpoint,
                       aws_access_key_id=admin_key, aws_secret_access_key=admin_secret)
    iam.update_assume_role_policy(RoleName="meridian-archive", PolicyDocument=trust_policy(external_id))
    sys.exit(0)

endpoint, bucket, region, external_id = sys.argv[1:5]
bootstrap = dict(endpoint_url=endpoint, aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
iam = boto3.client("iam", region_name="us-east-1", **bootstrap)
iam.create_user(UserName="meridian")
access_key = iam.create_access_key(UserName="meridian")["AccessKey"]
iam.put_user_policy(
    UserName="meridian",
    PolicyName="assume-customer-roles",
    PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "sts:AssumeRole", "Resource": "*"}]}),
)
role = iam.create_role(RoleName="meridian-archive", AssumeRolePolicyDocument=trust_policy(external_id))
iam.put_role_policy(
    RoleName="meridian-archive",
    PolicyName="archive-bucket",
    PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}),
)
# The customer's own administrator, who reads the bucket and edits the role's trust policy.
iam.create_user(UserName="customer-admin")
admin_key = iam.create_access_key(UserName="customer-admin")["AccessKey"]
iam.put_user_policy(
    UserName="customer-admin",
    PolicyName="s3-and-trust",
    PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["s3:*", "iam:UpdateAssumeRolePolicy"], "Resource": "*"}]}),
)
s3 = boto3.client("s3", region_name=region, **bootstrap)
s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": region})
request = urllib.request.Request(
    endpoint + "/moto-api/reset-auth", data=b"0", headers={"Content-Type": "text/plain"}, method="POST")
urllib.request.urlopen(request).read()
print(json.dumps({
    "access_key_id": access_key["AccessKeyId"],
    "secret_access_key": access_key["SecretAccessKey"],
    "role_arn": role["Role"]["Arn"],
    "customer_access_key_id": admin_key["AccessKeyId"],
    "customer_secret_access_key": admin_key["SecretAccessKey"],
}))
